"""The root of every exception the proxy defines, and where each is raised and caught.

    ProxyError                      root: everything proxy/ raises on purpose
    ├── OriginError                 origin.py: no answer from the origin; ``status`` is cachecar's
    │   │                           answer instead (caught by handler, passthrough, writes)
    │   ├── OriginUnreachable       origin.py: refused, reset, unresolvable, not HTTP (502)
    │   ├── OriginTimeout           origin.py: no answer within upstream.timeout (504)
    │   └── OriginBusy              origin.py: every upstream connection stayed busy (503)
    ├── RequestBodyError            origin.py: the client's body failed while being sent (caught
    │   │                           by passthrough: the client's fault, not the origin's)
    │   ├── BodyTooLarge            passthrough.py: past server.max_body (413)
    │   ├── BodyStalled             passthrough.py: nothing for server.body_timeout (408)
    │   └── BodyOverdue             passthrough.py: not whole within server.body_deadline (408)
    ├── ClientGone                  passthrough.py: the client left mid-body (handler counts 499)
    ├── AnswerError                 framing.py: what the origin sent is not an answer, or broke off
    │   │                           (origin turns it into OriginUnreachable; relay cuts the client)
    │   ├── ConnectFailed           http1.py: no connection to the origin
    │   ├── BodyFailed              http1.py: the request body failed while it was sent (its
    │   │                           cause is passthrough's RequestBodyError)
    │   └── Unanswered              framing.py: closed before a byte came (Pool sends it again)
    ├── Oversized                   origin.py: also the engine's LoadDeclined; a fetch past its
    │                               limit, still open (handler relays it uncached)
    ├── BadPath (ValueError)        paths.py: a request target that cannot be normalized
    │                               (handler answers 400)
    ├── TemplateError (ValueError)  templates.py: a route's path or key template (settings turns
    │                               it into a validation error naming the key)
    ├── ConfigError                 config.py: an invalid config, every problem by key path
    │                               (cli prints it and exits)
    ├── _TooMany                    config.py: internal control flow, never leaves
    │                               parse_settings: becomes a ConfigError (aliases expand too far)
    └── ListenError                 listen.py: a listener cannot bind its address (cli prints it)

The classes stay in the modules that raise them (moving them here would make this module import
``cache`` and ``proxy.settings``); ``tests/proxy/test_errors.py`` checks that every exception
class in ``proxy/`` derives from ``ProxyError`` and is drawn above.
"""

from __future__ import annotations


class ProxyError(Exception):
    """Root of every exception the proxy raises on purpose."""
