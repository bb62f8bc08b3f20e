# -*- coding: utf-8 -*-
# vim: set syntax=yaml ts=2 sw=2 sts=2 et :
#
# qubes-mcp: the layout of docs/operator-guide.md, section 1, with the qvm.* states Qubes ships.
#
#   sudo cp -r qubes-mcp /srv/salt/
#   sudo qubesctl state.sls qubes-mcp test=True   # dry run (qvm.prefs ignores test=True, see README)
#   sudo qubesctl state.sls qubes-mcp
#
# Names and the egress qube's upstream come from pillar `qubes-mcp:` (see README.md); the
# defaults match the operator guide. Enrolment is done by qubes-mcp-admin (it records each
# qube by name in dom0 and re-renders the policy), so install the dom0 package and run
# `qubes-mcp-admin install` first: the last states below call `qubes-mcp-admin enrol`.

{% set cfg = salt['pillar.get']('qubes-mcp', {}) %}
{% set control = cfg.get('control', 'mcp-control') %}
{% set egress = cfg.get('egress', 'ai-egress') %}
{% set upstream = cfg.get('upstream', 'sys-firewall') %}
{% set dvm = cfg.get('dvm', 'ai-dvm') %}
{% set dump = cfg.get('dump', 'ai-dump') %}
{% set dvm_tier = cfg.get('dvm_tier', 'exec') %}

# The agent's control qube: an ordinary AppVM, never enrolled in any scope.
qubes-mcp-control:
  qvm.vm:
    - name: {{ control }}
    - present:
      - label: purple
    - prefs:
      - label: purple
      - netvm: {{ upstream }}

# The one qube through which sandbox qubes reach the network (and templates their updates).
qubes-mcp-egress:
  qvm.vm:
    - name: {{ egress }}
    - present:
      - label: orange
    - prefs:
      - label: orange
      - provides-network: True
      - netvm: {{ upstream }}
    - service:
      - enable:
        - qubes-updates-proxy

# The disposable template the agent creates its disposables from; networked through egress.
qubes-mcp-dvm:
  qvm.vm:
    - name: {{ dvm }}
    - present:
      - label: red
    - prefs:
      - label: red
      - template-for-dispvms: True
      - netvm: {{ egress }}
    - features:
      - enable:
        - appmenus-dispvm
    - require:
      - qvm: qubes-mcp-egress

# Where the agent drops files for the operator: no network, copy-in only.
qubes-mcp-dump:
  qvm.vm:
    - name: {{ dump }}
    - present:
      - label: gray
    - prefs:
      - label: gray
      - netvm: none

# Enrolment, by name, in dom0 (idempotent).
qubes-mcp-enrol-egress:
  cmd.run:
    - name: qubes-mcp-admin enrol {{ egress }}
    - require:
      - qvm: qubes-mcp-egress

qubes-mcp-enrol-dvm:
  cmd.run:
    - name: qubes-mcp-admin enrol {{ dvm }} --tier {{ dvm_tier }}
    - require:
      - qvm: qubes-mcp-dvm

qubes-mcp-enrol-dump:
  cmd.run:
    - name: qubes-mcp-admin enrol {{ dump }} --dump
    - require:
      - qvm: qubes-mcp-dump
