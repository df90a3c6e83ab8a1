"""The v4 REST-JSON shim: the envelope legacy callers speak, translated onto follow.v1.

usersig   UserSig (TLS signature v2) verification
envelope  query parameters, the response envelope and its errors
commands  v4 JSON <-> follow.v1 protobuf, one entry per command
http      the aiohttp application and its lifecycle
"""
