from tta_bench.cli import main

raise SystemExit(main())
