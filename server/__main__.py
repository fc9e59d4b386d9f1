"""`python -m server` is `fieldsync`."""

from server.cli import main

main()
