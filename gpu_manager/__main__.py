"""``python -m gpufaas.gpu_manager``: the GPU manager, as ``gpufaas up`` starts it."""

import sys

from gpufaas.core.cli import configure_logging
from gpufaas.gpu_manager.cli import main

if __name__ == "__main__":
    configure_logging(verbose=False)
    sys.exit(main())
