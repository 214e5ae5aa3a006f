"""Extra ``kdistill`` subcommands: each module defines ``register(subparsers)`` and is found automatically."""
