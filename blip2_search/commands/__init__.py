"""The ``blip2-search`` subcommands, one module per command (group); ``blip2_search.cli`` assembles them.

Each command is a thin shell over a package function. Heavy imports (torch, transformers) happen inside
the commands so ``--help`` stays instant.
"""
