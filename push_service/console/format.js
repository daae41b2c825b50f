// Numbers, durations and errors as an operator reads them.
"use strict";

const compact = new Intl.NumberFormat("en", { notation: "compact", maximumFractionDigits: 1 });

// 950 -> "950", 1234 -> "1.2k", 2500000 -> "2.5M"; small fractions keep one decimal.
export function number(value) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  if (Math.abs(value) < 10 && !Number.isInteger(value)) return value.toFixed(1);
  return compact.format(value).replace("K", "k");
}

export const perSecond = (value) => `${number(value)}/s`;

export function milliseconds(value) {
  if (value === null || value === undefined) return "–";
  if (value === 0) return "0 ms";
  return value < 1 ? `${value.toFixed(2)} ms` : value < 10 ? `${value.toFixed(1)} ms` : `${Math.round(value)} ms`;
}

// 45 -> "45 s", 3840 -> "1 h 4 min", 200000 -> "2 d 7 h".
export function duration(seconds) {
  seconds = Math.max(0, Math.floor(seconds));
  if (seconds < 60) return `${seconds} s`;
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) return `${minutes} min`;
  const hours = Math.floor(minutes / 60);
  if (hours < 24) return minutes % 60 ? `${hours} h ${minutes % 60} min` : `${hours} h`;
  const days = Math.floor(hours / 24);
  return hours % 24 ? `${days} d ${hours % 24} h` : `${days} d`;
}

export function ago(unixSeconds) {
  if (!unixSeconds) return "never";
  const seconds = Date.now() / 1000 - unixSeconds;
  return seconds < 1 ? "just now" : `${duration(seconds)} ago`;
}

export const clock = (unixSeconds) => new Date(unixSeconds * 1000).toLocaleTimeString();

// What went wrong, in words: the server's own error where it gave one.
export function explain(status, answer) {
  const said = answer && typeof answer.error === "string" ? answer.error : "";
  if (status === 401) return "The admin key was refused. Sign in again with PUSH_ADMIN_KEY.";
  if (status === 403) return said ? `Not allowed: ${said}.` : "Not allowed.";
  if (status === 503) return `The server cannot do that right now${said ? ` (${said})` : ""}. Try again in a moment.`;
  if (status >= 500) return `The server failed (HTTP ${status}). Its log has the details.`;
  return said ? `${said[0].toUpperCase()}${said.slice(1)}.` : `The server answered HTTP ${status}.`;
}

export const unreachable = "Cannot reach the server: is it running, and is this the right address?";
