// Keyboard shortcuts for the labeling page; every action is also a plain form button.
document.addEventListener("keydown", (event) => {
  const target = event.target;
  if (target && (target.tagName === "INPUT" || target.tagName === "TEXTAREA")) return;
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const buttons = {
    a: "choose-a", ArrowLeft: "choose-a", 1: "choose-a",
    b: "choose-b", ArrowRight: "choose-b", 2: "choose-b",
    t: "tie", 3: "tie",
    s: "skip",
    u: "undo",
  };
  const id = buttons[event.key];
  const button = id && document.getElementById(id);
  if (button) {
    event.preventDefault();
    button.click();
  }
});
document.body.dataset.shortcuts = "ready"; // lets tests (and people) know keys work now
