"""Stand-ins shared by tests/ and bench/: what the lab talks to, without the real thing.

- messages_server.py: a local Anthropic Messages API (scripted replies, prompt caching, a virtual clock)
- scripted_researcher.py: Claude played by a script, and whole agent=claude nights run against that server
- train.py: the stand-in for `python -m src.train` (the same CLI contract, no torch, a val_bpb by formula)
- redteam.py: patches a cheating agent might write, and honest ones
- project.py: a throwaway git copy of the project and what a stand-in session needs around it

Not part of the installed package (pyproject.toml packages src only); importable from the repository root
(pytest's pythonpath, the benches' sys.path).

Usage: from src.lab.fakes.messages_server import MessagesServer, tool_use
"""
