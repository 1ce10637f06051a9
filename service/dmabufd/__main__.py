from dmabufd.cli import main

raise SystemExit(main())
