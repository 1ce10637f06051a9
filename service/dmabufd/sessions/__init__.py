"""Who holds what.

session.py  a client's session (its fd socket, token and tickets) and the
            table of open sessions
ledger.py   every buffer the daemon handed out, by session and uid, and the
            quotas checked before allocating
procfs.py   what /proc says about a client: groups, command, open buffers
holders.py  the helper processes that ask /proc for a Release, off the
            event loop's interpreter
"""
