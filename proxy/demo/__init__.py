"""``cachecar demo`` and ``cachecar origin``: the runner (``runner``), the demo data store
(``origin``) and the traffic sent through the proxy (``traffic``)."""
