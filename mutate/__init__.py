"""The mitigation audit: each mitigation of threat-model/threats.toml, removed in
a copy of the tree, must make its tests fail. ``python -m mutate``; the parts:

* mutate.model: threats.toml as types, and its consistency checks;
* mutate.workspace: the copy of the tree and its venv;
* mutate.run: the audit itself and its command line.
"""
