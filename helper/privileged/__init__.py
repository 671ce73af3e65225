"""Code that runs inside the privileged helper process.

Everything here runs with privilege; keep it small.

Besides this subpackage the helper imports only the pure modules it shares with
the boss: protocol, policy, ratelimit, procstatus, audit and exitcodes.
"""
