// How the browser tests start Debian's Chromium: headless, no sandbox (root in CI), nothing fetched
// from the network by the browser itself. Playwright passes --user-data-dir (a fresh directory) itself.
export const CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync"];
