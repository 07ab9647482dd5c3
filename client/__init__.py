"""client package (filled in by later issues)."""
