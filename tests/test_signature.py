from connector.signature import is_valid, sign

# Known-answer vector published in GitHub's webhook documentation (same HMAC-SHA256 scheme and
# `sha256=` header format as Meta's X-Hub-Signature-256).
SECRET = "It's a Secret to Everybody"
BODY = b"Hello, World!"
EXPECTED = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"


def test_sign_matches_published_vector():
    assert sign(BODY, SECRET) == EXPECTED


def test_accepts_own_signature_and_uppercase_hex():
    assert is_valid(BODY, EXPECTED, SECRET)
    assert is_valid(BODY, "sha256=" + EXPECTED[7:].upper(), SECRET)


def test_rejects_other_body_secret_or_format():
    assert not is_valid(b"Hello, World?", EXPECTED, SECRET)
    assert not is_valid(BODY, EXPECTED, "another secret")
    assert not is_valid(BODY, EXPECTED[7:], SECRET)  # no "sha256=" prefix
    assert not is_valid(BODY, "sha1=" + EXPECTED[7:], SECRET)
    assert not is_valid(BODY, "", SECRET)


def test_raw_bytes_are_signed_not_reserialised_json():
    raw = '{"text":"caf\\u00e9"}'.encode()
    reserialised = '{"text":"café"}'.encode()
    assert not is_valid(reserialised, sign(raw, SECRET), SECRET)


def test_non_ascii_header_is_simply_invalid():
    assert not is_valid(BODY, "sha256=é" + EXPECTED[8:], SECRET)
    assert not is_valid(BODY, "\udcff", SECRET)
