// A minimal XMLHttpRequest over fetch, for phoenix.js 1.6 and 1.7 under Node: their LongPoll needs
// `XMLHttpRequest` (1.8 uses fetch when there is none). Only what phoenix's Ajax.xhrRequest uses:
// open, setRequestHeader, timeout, send, abort, readyState, status, responseText, and the
// onreadystatechange / onerror / ontimeout callbacks, fired as a browser fires them.

export default class FetchXMLHttpRequest {
  constructor() {
    this.readyState = 0;
    this.status = 0;
    this.responseText = "";
    this.timeout = 0;
    this.onreadystatechange = null;
    this.onerror = null;
    this.ontimeout = null;
    this._headers = {};
    this._controller = new AbortController();
    this._aborted = false;
  }

  open(method, url) {
    this._method = method;
    this._url = url;
    this.readyState = 1;
  }

  setRequestHeader(name, value) {
    this._headers[name] = value;
  }

  send(body) {
    let timedOut = false;
    const timer = this.timeout ? setTimeout(() => { timedOut = true; this._controller.abort(); }, this.timeout) : null;
    const done = () => {
      clearTimeout(timer);
      this.readyState = 4;
    };
    fetch(this._url, {
      method: this._method, headers: this._headers, body: body == null ? undefined : body,
      signal: this._controller.signal,
    }).then(async (response) => {
      const text = await response.text();
      if (this._aborted) return;
      this.status = response.status;
      this.responseText = text;
      done();
      if (this.onreadystatechange) this.onreadystatechange();
    }).catch(() => {
      if (this._aborted) return;
      done();
      if (timedOut) {
        if (this.ontimeout) this.ontimeout();
        return;
      }
      // a network error: readyState 4 with status 0, then the error event
      if (this.onreadystatechange) this.onreadystatechange();
      if (this.onerror) this.onerror();
    });
  }

  abort() {
    this._aborted = true;
    this._controller.abort();
  }
}
