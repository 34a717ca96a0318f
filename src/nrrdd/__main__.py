from nrrdd.cli import main


raise SystemExit(main())
