"""`privsock run`: privileged ports for unmodified programs that call bind()
themselves, through seccomp user notification. Boss side only: nothing here
is imported by the helper."""
