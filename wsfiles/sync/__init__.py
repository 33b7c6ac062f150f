"""``wsfiles sync``: keep a local folder tree and a server folder tree the same.

Architecture, in five layers, each testable on its own:

- :mod:`.model` holds the plain records every layer shares (files, state rows, actions).
- :mod:`.localtree` scans the local tree (no symlinks, no special files, no names the
  server would refuse) and :mod:`.state` remembers, in SQLite, what both sides last held.
- :mod:`.plan` is a pure function: local scan + remote listing + state -> a list of actions.
- :mod:`.runner` carries a plan out over one command channel (pipelined, verified, resumable).
- :mod:`.watch` re-plans on inotify and ``changed`` events; :mod:`wsfiles.cli_sync` is the CLI.
"""
