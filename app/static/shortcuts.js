() => {
  // Keyboard shortcuts for the labelling buttons; ignored while typing in a text box.
  if (window.__alignKeys) return;
  window.__alignKeys = true;
  const MAP = {"1": "btn-a", "a": "btn-a", "2": "btn-b", "b": "btn-b", "3": "btn-tie", "t": "btn-tie",
               "4": "btn-bad", "x": "btn-bad", "5": "btn-skip", "s": "btn-skip", "u": "btn-undo"};
  const TEXT = new Set(["text", "password", "search", "email", "number", "url", "tel", ""]);
  const typing = (el) => {
    if (!el) return false;
    const tag = (el.tagName || "").toLowerCase();
    if (tag === "textarea" || tag === "select" || el.isContentEditable) return true;
    return tag === "input" && TEXT.has((el.getAttribute("type") || "").toLowerCase());
  };
  const find = (id) => {
    const el = document.getElementById(id);
    if (!el) return null;
    return el.tagName === "BUTTON" ? el : el.querySelector("button");
  };
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && typing(e.target)) { e.target.blur(); return; }
    if (e.ctrlKey || e.metaKey || e.altKey || e.repeat || typing(e.target)) return;
    const id = MAP[(e.key || "").toLowerCase()];
    if (!id) return;
    const btn = find(id);
    if (!btn || btn.disabled || btn.offsetParent === null) return;
    e.preventDefault();
    btn.click();
  });
  // A multi-turn prompt: when a new one shows, scroll its chat to the end, where the turn the two replies
  // answer is (Gradio's autoscroll left long conversations at their first turn). The chat is rendered only
  // after sign-in, so the page is watched and mutations inside the chat count.
  let pending = false;
  const toEnd = () => {
    pending = false;
    const chat = document.getElementById("al-prompt");
    for (const el of chat ? [chat, ...chat.querySelectorAll("*")] : []) {
      if (el.scrollHeight > el.clientHeight + 4 && /(auto|scroll)/.test(getComputedStyle(el).overflowY)) {
        el.scrollTop = el.scrollHeight;
      }
    }
  };
  new MutationObserver((records) => {
    const chat = document.getElementById("al-prompt");
    if (pending || !chat || !records.some((r) => chat.contains(r.target))) return;
    pending = true;
    setTimeout(toEnd, 100);
  }).observe(document.body, {childList: true, subtree: true, characterData: true});
}
