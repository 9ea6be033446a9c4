"""The FwdLLM federated protocol (work in progress): messages (``messages``) and data (``data``).
The server/client roles, the in-process driver and the Flower app build on these."""
