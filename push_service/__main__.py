import sys

from push_service.cli import main

sys.exit(main())
