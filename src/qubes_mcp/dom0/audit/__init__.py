"""The dom0 audit log: one hash chain of every request and every operator act.

- ``log``: :class:`~qubes_mcp.dom0.audit.log.AuditLog`, the only writer (append, rotate,
  checkpoint, recover), under one file lock.
- ``record`` and ``clean``: one line of the chain, and what an agent's text may put in it.
- ``files``: the files on disk (current, rotated, anchor, export checkpoint, lock).
- ``verify`` and ``repair``: walk the chain; repair only a crash's signature.
- ``show`` and ``summary``: read it as a timeline; fold refusal floods into summaries.
- ``acts``: the operator's acts, recorded in the same chain.

The operator's commands over it live in :mod:`qubes_mcp.dom0.operator`.
"""
