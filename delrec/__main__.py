from delrec.cli import main

raise SystemExit(main())
