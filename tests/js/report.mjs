// Shared by the client scripts: report a channel's life as JSON lines, and never outlive the test.

export function reportJoin(channel, topic, emit) {
  channel.onError(() => emit({ event: "channel_error", topic }));
  channel.onClose(() => emit({ event: "channel_close", topic }));
  channel.join()
    .receive("ok", (response) => emit({ event: "join", topic, status: "ok", response }))
    .receive("error", (response) => emit({ event: "join", topic, status: "error", response }))
    .receive("timeout", () => emit({ event: "join", topic, status: "timeout" }));
}

export function exitWithStdin() {
  process.stdin.on("end", () => process.exit(0));
  process.stdin.resume();
}
