// API reference rendered from /api/openapi.json (OpenAPI 3.1 generated from the server's pydantic models),
// including the data channel events listed under `x-data-channel-events`.
import { api, banner, h, mountHeader } from "./common.js";
import { onLangChange, t } from "./i18n.js";

const $ = (id) => document.getElementById(id);
let spec = null;

const refName = (ref) => ref.split("/").pop();

/** Text with `backtick` spans shown as code (descriptions come from the server's docstrings). */
function rich(text, tag = "span", attrs = {}) {
  const parts = String(text || "").split("`");
  return h(tag, attrs, parts.map((part, i) => (i % 2 ? h("code", {}, part) : part)));
}
const anchor = (kind, name) => `${kind}-${name.replace(/[^A-Za-z0-9]+/g, "-")}`;

function resolve(schema) {
  let s = schema || {};
  for (let i = 0; s.$ref && i < 10; i++) s = spec.components.schemas[refName(s.$ref)] || {};
  return s;
}

/** A short type label, with links to named schemas. */
function typeLabel(schema) {
  if (!schema) return "any";
  if (schema.$ref) return h("a", { href: `#${anchor("schema", refName(schema.$ref))}` }, refName(schema.$ref));
  if (schema.const !== undefined) return h("code", {}, JSON.stringify(schema.const));
  if (schema.enum) return h("span", {}, schema.enum.map((v) => JSON.stringify(v)).join(" | "));
  const union = schema.anyOf || schema.oneOf;
  if (union) {
    const parts = union.map((s) => typeLabel(s));
    return h("span", {}, parts.flatMap((p, i) => (i ? [" | ", p] : [p])));
  }
  if (schema.type === "array") return h("span", {}, `${t("docs.arrayOf")} `, typeLabel(schema.items));
  if (schema.type === "object" && schema.additionalProperties && typeof schema.additionalProperties === "object") {
    return h("span", {}, `${t("docs.mapOf")} `, typeLabel(schema.additionalProperties));
  }
  return Array.isArray(schema.type) ? schema.type.join(" | ") : schema.type || "any";
}

function constraints(schema) {
  const notes = [];
  for (const key of ["minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "pattern"]) {
    if (schema[key] !== undefined) notes.push(`${key}: ${schema[key]}`);
  }
  if (schema.default !== undefined) notes.push(`${t("docs.default")}: ${JSON.stringify(schema.default)}`);
  return notes.join(" · ");
}

function schemaTable(schema) {
  const s = resolve(schema);
  if (s.type !== "object" || !s.properties) return h("p", {}, typeLabel(schema));
  const required = new Set(s.required || []);
  const rows = Object.entries(s.properties).map(([name, prop]) =>
    h(
      "tr",
      {},
      h("td", {}, name),
      h("td", {}, typeLabel(prop)),
      h("td", {}, required.has(name) ? t("docs.yes") : t("docs.no")),
      rich([prop.description || "", constraints(prop)].filter(Boolean).join(" — "), "td", { class: "wrap" }),
    ),
  );
  return h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      { class: "schema-table" },
      h("thead", {}, h("tr", {}, ["docs.field", "docs.type", "docs.required", "docs.notes"].map((k) => h("th", {}, t(k))))),
      h("tbody", {}, rows),
    ),
  );
}

function example(schema, depth = 0) {
  const s = resolve(schema);
  if (depth > 5) return null;
  if (s.const !== undefined) return s.const;
  if (s.default !== undefined && s.default !== null) return s.default;
  if (s.enum) return s.enum[0];
  const union = s.anyOf || s.oneOf;
  if (union) return example(union.find((u) => u.type !== "null") || union[0], depth + 1);
  switch (s.type) {
    case "object": {
      const out = {};
      for (const [name, prop] of Object.entries(s.properties || {})) out[name] = example(prop, depth + 1);
      return out;
    }
    case "array":
      return [example(s.items, depth + 1)];
    case "integer":
      return 1;
    case "number":
      return 12.5;
    case "boolean":
      return true;
    case "string":
      return "…";
    default:
      return null;
  }
}

function bodySection(titleKey, content) {
  const [type, media] = Object.entries(content)[0];
  return h(
    "div",
    {},
    h("h4", {}, `${t(titleKey)} `, h("code", {}, type)),
    media.schema && (media.schema.$ref || media.schema.properties) ? schemaTable(media.schema) : h("p", { class: "muted" }, typeLabel(media.schema)),
  );
}

function operationCard(path, method, op) {
  const card = h("section", { class: "card op", id: anchor("op", `${method}-${path}`) });
  card.append(
    h("div", { class: "op-head" }, h("span", { class: `method ${method}` }, method.toUpperCase()), h("code", {}, path), h("span", { class: "muted" }, op.summary)),
  );
  if (op.description) card.append(rich(op.description, "p"));
  const secured = (op.security || []).filter((req) => Object.keys(req).length);
  if (secured.length) {
    card.append(h("p", { class: "small" }, h("span", { class: "badge warn" }, t("docs.auth")), " ", secured.map((r) => Object.keys(r).join(" + ")).join(", ")));
  }
  if (op.parameters && op.parameters.length) {
    card.append(
      h("h4", {}, t("docs.parameters")),
      h(
        "div",
        { class: "table-wrap" },
        h(
          "table",
          { class: "schema-table" },
          h("thead", {}, h("tr", {}, ["docs.field", "docs.in", "docs.required", "docs.notes"].map((k) => h("th", {}, t(k))))),
          h(
            "tbody",
            {},
            op.parameters.map((p) => h("tr", {}, h("td", {}, p.name), h("td", {}, p.in), h("td", {}, p.required ? t("docs.yes") : t("docs.no")), h("td", { class: "wrap" }, p.description || ""))),
          ),
        ),
      ),
    );
  }
  if (op.requestBody) card.append(bodySection("docs.request", op.requestBody.content));
  const responses = h("ul", {});
  for (const [code, resp] of Object.entries(op.responses)) {
    const media = resp.content ? Object.entries(resp.content)[0] : null;
    const schema = media && media[1].schema;
    responses.append(
      h(
        "li",
        {},
        h("strong", {}, code),
        " ", rich(resp.description),
        media ? h("span", { class: "muted" }, " — ", h("code", {}, media[0]), " ", schema ? typeLabel(schema) : "") : null,
      ),
    );
  }
  card.append(h("h4", {}, t("docs.responses")), responses);
  return card;
}

function eventCard(name) {
  const schema = spec.components.schemas[name] || {};
  return h(
    "section",
    { class: "card op", id: anchor("event", name) },
    h("div", { class: "op-head" }, h("code", {}, JSON.stringify(example({ $ref: `#/components/schemas/${name}` }).type)), h("span", { class: "muted" }, name)),
    schema.description ? rich(schema.description, "p") : null,
    schemaTable({ $ref: `#/components/schemas/${name}` }),
    h("pre", { class: "example" }, JSON.stringify(example({ $ref: `#/components/schemas/${name}` }))),
  );
}

function render() {
  if (!spec) return;
  const doc = $("doc");
  const toc = $("toc");
  doc.innerHTML = "";
  toc.innerHTML = "";
  doc.append(
    h("div", {}, h("h1", {}, spec.info.title), h("p", { class: "muted" }, `${t("docs.version")} ${spec.info.version} · OpenAPI ${spec.openapi} · `, h("a", { href: "/api/openapi.json" }, "openapi.json")), rich(spec.info.description, "p")),
  );
  const schemes = spec.components.securitySchemes || {};
  doc.append(
    h("h2", { id: "auth" }, t("docs.authTitle")),
    h("ul", {}, Object.entries(schemes).map(([name, s]) => h("li", {}, h("code", {}, name), " — ", rich(s.description || s.type)))),
  );
  toc.append(h("a", { href: "#auth" }, t("docs.authTitle")));

  const byTag = new Map((spec.tags || []).map((tag) => [tag.name, []]));
  for (const [path, item] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(item)) {
      const tag = (op.tags && op.tags[0]) || "other";
      if (!byTag.has(tag)) byTag.set(tag, []);
      byTag.get(tag).push([path, method, op]);
    }
  }
  toc.append(h("h3", {}, t("docs.endpoints")));
  for (const [tag, ops] of byTag) {
    if (!ops.length) continue;
    const info = (spec.tags || []).find((x) => x.name === tag);
    doc.append(h("h2", { id: anchor("tag", tag) }, tag), info && info.description ? h("p", { class: "muted" }, info.description) : null);
    toc.append(h("a", { href: `#${anchor("tag", tag)}` }, tag));
    for (const [path, method, op] of ops) doc.append(operationCard(path, method, op));
  }

  const events = spec["x-data-channel-events"];
  if (events) {
    toc.append(h("h3", {}, t("docs.events")));
    doc.append(h("h2", { id: "events" }, t("docs.events")), rich(t("docs.eventsLead", { channel: events.channel }), "p"));
    for (const [key, list] of [["docs.serverToClient", events.server_to_client], ["docs.clientToServer", events.client_to_server]]) {
      const id = anchor("dir", key);
      doc.append(h("h3", { id }, t(key)));
      toc.append(h("a", { href: `#${id}` }, t(key)));
      for (const name of list) doc.append(eventCard(name));
    }
  }

  const realtime = spec["x-realtime-events"]; // OpenAI Realtime API compatibility (docs/REALTIME.md)
  if (realtime) {
    toc.append(h("h3", {}, h("a", { href: "#realtime-events" }, "Realtime API events")));
    doc.append(h("h2", { id: "realtime-events" }, "Realtime API events"), rich(`${realtime.description}; ${realtime.channels}.`, "p"));
    for (const [key, list] of [["docs.serverToClient", realtime.server_to_client], ["docs.clientToServer", realtime.client_to_server]]) {
      doc.append(h("h3", {}, t(key)));
      for (const name of list) doc.append(eventCard(name));
    }
  }

  toc.append(h("h3", { class: "toc-schemas" }, t("docs.schemas")));
  doc.append(h("h2", { id: "schemas" }, t("docs.schemas")));
  for (const [name, schema] of Object.entries(spec.components.schemas)) {
    doc.append(h("section", { class: "card op", id: anchor("schema", name) }, h("h3", {}, name), schema.description ? rich(schema.description, "p") : null, schemaTable({ $ref: `#/components/schemas/${name}` })));
    toc.append(h("a", { class: "toc-minor", href: `#${anchor("schema", name)}` }, name));
  }
  if (location.hash) document.getElementById(location.hash.slice(1))?.scrollIntoView();
}

mountHeader("/docs");
onLangChange(render);
try {
  spec = await api("/api/openapi.json");
  render();
} catch (err) {
  $("doc").innerHTML = "";
  $("messages").append(banner("error", t("docs.loadFailed"), `${err.message} (${err.code})`));
}
