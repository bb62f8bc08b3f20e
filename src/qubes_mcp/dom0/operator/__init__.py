"""The operator's side of dom0: ``qubes-mcp-admin`` and what it runs.

``cli`` parses the command line; ``cli_gate`` runs each subcommand. ``install`` writes the
config, the enrolment registry and the policy (checked by ``qubes_policy_tools`` when Qubes'
own tools are there); ``doctor``, ``explain`` and ``policy_overlap`` say what is installed and
what it means; ``audit_cli`` holds the audit log's repairs. None of this runs in the gate's
request pipeline, which stays at the top of :mod:`qubes_mcp.dom0`.
"""
