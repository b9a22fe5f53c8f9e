from kdfast.info import main

raise SystemExit(main())
