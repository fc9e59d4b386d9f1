"""Domain record shapes and merge constraints for fieldsync.

Import the submodules you need (``registry``, ``record``, ``constraints``);
this package deliberately re-exports nothing. It does no I/O.
"""
