from ssl_foundry.launch.cli import main

raise SystemExit(main())
