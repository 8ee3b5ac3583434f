"""``python -m backer``: the console entry point; a Ctrl-C that comes while it loads
(before it holds one) ends the command as one there does."""

try:
    from backer.entry import main

    main()
except KeyboardInterrupt:
    raise SystemExit("aborted") from None
