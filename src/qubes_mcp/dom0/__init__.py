"""The dom0 side of qubes-mcp: the gate daemon and the operator's ``qubes-mcp-admin`` tool.

Standard library only (dom0 gets no pip); may import :mod:`qubes_mcp.policy`.
"""
