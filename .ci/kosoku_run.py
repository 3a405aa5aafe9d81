"""Runs kosoku (its command line, unchanged) with one fix to its copy of the
Autobahn case code for cases 12 and 13.

kosoku 0.1.0 hands a case an uncompressed message on a permessage-deflate
connection as a `str` (its bytes read as Latin-1, as Python 2's str was),
and the case code hashes it with hashlib, which takes bytes only: the case
ends in ERROR. RFC 7692 §6 lets a server send any message uncompressed
(wsgate does below --compress-min and when deflate does not shrink a
message), and Autobahn's own Python client hands over bytes, so the fix
gives the case the message's bytes back.
"""

import kosoku.cases  # noqa: F401 (builds the case index: puts the cases on sys.path)
import case12_x_x as compression  # the module the index took its classes from
from kosoku._cli import main

_on_message = compression.onMessage


def on_message(self, msg, binary):
    if isinstance(msg, str):
        msg = msg.encode("latin-1")
    return _on_message(self, msg, binary)


for case in compression.Case12_X_X + compression.Case13_X_X:
    case.onMessage = on_message

main()
