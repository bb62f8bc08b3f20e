"""qubes-mcp: let AI agents operate a Qubes OS machine through MCP, bounded in dom0."""

__version__ = "0.1.0"
