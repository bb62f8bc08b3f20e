"""dom0-side tools of the emulated dom0 (what a real dom0 has in /usr/bin)."""
