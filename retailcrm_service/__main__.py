import sys

from retailcrm_service.cli import main

sys.exit(main())
