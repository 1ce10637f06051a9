"""How clients reach the daemon.

runtime_dir.py  the runtime directory: single-instance lock, socket files
fdserver.py     the fd socket (SOCK_SEQPACKET, SCM_RIGHTS): sessions start
                here and every buffer fd leaves through it
grpc_server.py  the control socket: gRPC over AF_UNIX
"""
