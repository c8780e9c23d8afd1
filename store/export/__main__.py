from store.export.export import main

raise SystemExit(main())
