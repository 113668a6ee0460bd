import { api, banner, h, ICONS, mountHeader } from "./common.js";
import { onLangChange, t } from "./i18n.js";
import { MODES } from "./modes.js";

let info = null;
let infoError = null;

function renderMessages() {
  const box = document.getElementById("messages");
  box.innerHTML = "";
  if (infoError) {
    if (infoError.status === 401) box.append(banner("error", t("home.infoFailed"), t("home.needToken"), true));
    else box.append(banner("error", t("home.infoFailed"), `${infoError.code}: ${infoError.message}`));
  } else if (info && info.embedded_model) {
    const el = banner("warn", t("home.embeddedTitle"), t("home.embeddedText"), true);
    el.id = "embedded-banner";
    box.append(el);
  }
}

function renderModes() {
  const grid = document.getElementById("modes");
  grid.innerHTML = "";
  for (const mode of MODES) {
    const available = info ? info.modes.includes(mode.id) : null;
    const card = h("article", { class: `card mode-card${available === false ? " unavailable" : ""}`, "data-mode": mode.id });
    const icon = h("div", { class: "icon" });
    icon.innerHTML = ICONS[mode.icon];
    const status =
      available === null
        ? null
        : h("span", { class: `badge ${available ? "ok" : ""}` }, t(available ? "home.available" : "home.unavailable"));
    card.append(
      icon,
      h("h2", {}, t(`mode.${mode.key}.title`)),
      h("p", {}, t(`mode.${mode.key}.text`)),
      h(
        "div",
        { class: "foot" },
        status,
        h("a", { class: `button ${available === false ? "" : "primary"}`, href: `/call?mode=${mode.id}&autostart=1` }, t("home.start")),
      ),
    );
    grid.append(card);
  }
}

function render() {
  renderMessages();
  renderModes();
  document.getElementById("version").textContent = info ? t("home.version", { version: info.version }) : "";
}

mountHeader("/");
onLangChange(render);
render();
try {
  info = await api("/api/info");
} catch (err) {
  infoError = err;
}
render();
