"""Example services that run unprivileged on sockets from privsock."""
