"""The helper: exactly the code the privileged process runs, and nothing else.

``main`` is the start-up order; everything it imports lives in this folder, and
none of it imports the boss side (tests/test_layout.py checks both). Keep it small:
``wc -l privsock/helper/*.py`` is the trusted-code count the README gives.
"""
