// A wsgate client that resumes: no message lost or repeated across a
// reconnect while the lobby's history holds what it missed (README,
// "WebSocket resume"). No dependencies; load it with a <script> tag.
//
//   const feed = wsgateResume("ws://127.0.0.1:8080/", {
//     onMessage(data, id) {},  // data: a string, or a Uint8Array if binary
//     onReset() {},            // the gap could not be filled: refetch state
//     onOpen() {},             // each (re)connection
//   });
//   feed.close();
function wsgateResume(url, handlers) {
  const PROTOCOL = "wsgate.resume.v1";
  const FIRST_DELAY_MS = 250;
  const MAX_DELAY_MS = 15000;
  let lastId = null;
  let failures = 0;
  let socket = null;
  let closed = false;

  function connect() {
    const target = new URL(url);
    if (lastId !== null) target.searchParams.set("last_event_id", lastId);
    socket = new WebSocket(target, PROTOCOL);
    socket.binaryType = "arraybuffer";
    socket.onopen = () => {
      failures = 0;
      if (handlers.onOpen) handlers.onOpen();
    };
    socket.onmessage = (event) => {
      // Every message is "<16 hex digits> <payload>"; only the reset is not.
      if (event.data === "reset") {
        if (handlers.onReset) handlers.onReset();
        return;
      }
      if (typeof event.data === "string") {
        lastId = event.data.slice(0, 16);
        handlers.onMessage(event.data.slice(17), lastId);
      } else {
        const bytes = new Uint8Array(event.data);
        lastId = String.fromCharCode(...bytes.subarray(0, 16));
        handlers.onMessage(bytes.subarray(17), lastId);
      }
    };
    socket.onclose = () => {
      if (closed) return;
      // Exponential, capped, with "equal jitter": half fixed, half random,
      // so clients dropped together do not come back together.
      const ceiling = Math.min(MAX_DELAY_MS, FIRST_DELAY_MS * 2 ** failures);
      failures += 1;
      setTimeout(connect, ceiling / 2 + Math.random() * (ceiling / 2));
    };
  }

  connect();
  return {
    close() {
      closed = true;
      socket.close();
    },
  };
}
