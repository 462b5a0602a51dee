import sys

from capibara_grpc.cli import main

sys.exit(main())
