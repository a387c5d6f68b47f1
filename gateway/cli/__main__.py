"""``python -m meter_gateway.gateway.cli``: the same as the ``meter-gateway`` command."""

import sys

from meter_gateway.gateway.cli.main import main

sys.exit(main(sys.argv[1:]))
