"""The MCP server in the control qube (``qubes-mcp serve``): untrusted, holds no authority.

Module map: ``table`` (the operations table, read from the generated ``operations.json``),
``transport`` (one qrexec call per tool call; every failure reads as not-found),
``gateway`` (progress, cancellation, refusal → ``ToolError``), ``params``/``models``
(argument and result schemas), ``tools_read``/``tools_act``/``tools_admin`` (the tools),
``registry`` (annotations and descriptions from the table), ``app`` (``build_server``),
``cli`` (``qubes-mcp serve``). It never imports ``qubes_mcp.dom0`` (tools/check_imports.py).
"""
