"""`python -m connector.simulator [serve|say|show] ...`"""

import sys

from .cli import main

sys.exit(main())
