"""`kvtier server`: our own remote cache server, and its client backend (`kvtier://` URLs).

protocol.py    the wire format shared by both sides (docs/protocol.md)
config.py      ServerConfig: what the server stores and the limits it enforces
store.py       ObjectCache: validated objects in memory (CPUTier) and on a write-through disk (ObjectDiskTier)
handlers.py    what each opcode does
server.py      the asyncio server (KVServer) and ServerThread (a server on a background thread)
admission.py   who gets a connection (login deadline, pending pool, fair main pool) and bytes in flight
stream.py      a connection's bytes: plain TCP, or TLS over memory BIOs
connection.py  client connections: framed requests under deadlines (plain or TLS), and a pool
client.py      KVTierClient, the ObjectStore of `kvtier[s]://[:token@]host:port`, and open_store()
main.py        the `kvtier server` command

Nothing is imported here, so the client does not pull in the server's dependencies.
"""
