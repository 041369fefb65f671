// The admin pages' progressive script: saving through the JSON API. Pages read without it.
// Every state-changing call carries the session's CSRF token from <meta name="csrf-token">.
"use strict";
(function () {
  const meta = (name) => (document.querySelector(`meta[name="${name}"]`) || {}).content || "";
  const csrf = meta("csrf-token");
  const number = meta("enterprise");
  const api = `/retailcrm-admin/api`;

  async function call(method, path, body) {
    const headers = { "X-CSRF-Token": csrf, "Accept": "application/json" };
    const init = { method, headers, credentials: "same-origin" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(api + path, init);
    } catch (err) {
      return { ok: false, status: 0, data: { error: { message: "сервис недоступен" } } };
    }
    let data = {};
    try { data = await response.json(); } catch (err) { data = {}; }
    return { ok: response.ok, status: response.status, data };
  }

  function show(box, kind, title, items) {
    if (!box) return;
    box.className = "result " + kind;
    box.textContent = "";
    const p = document.createElement("p");
    p.style.margin = "0";
    p.textContent = title;
    box.appendChild(p);
    if (items && items.length) {
      const ul = document.createElement("ul");
      for (const item of items) {
        const li = document.createElement("li");
        li.textContent = item;
        ul.appendChild(li);
      }
      box.appendChild(ul);
    }
  }

  function errorText(result) {
    const error = (result.data && result.data.error) || {};
    if (result.status === 401) return "Сессия истекла: откройте личный кабинет заново.";
    if (result.status === 403) return "Нет доступа: " + (error.message || "запрос отклонён");
    const fields = error.fields ? Object.entries(error.fields).map(([k, v]) => `${k}: ${v}`) : [];
    const base = error.message || `ошибка ${result.status}`;
    return fields.length ? `${base} (${fields.join("; ")})` : base;
  }

  function describeRetailCrm(err) {
    if (!err) return "неизвестная ошибка";
    const kinds = {
      auth: "RetailCRM не принял API-ключ",
      rate_limited: "RetailCRM ограничил частоту запросов",
      unavailable: "RetailCRM недоступен",
      api: "RetailCRM отклонил запрос",
    };
    let text = (kinds[err.kind] || "Ошибка RetailCRM") + (err.message ? `: ${err.message}` : "");
    if (err.errors) text += " — " + JSON.stringify(err.errors);
    return text;
  }

  function busy(button, on) {
    if (button) button.disabled = on;
  }

  // -- «Подключение» -----------------------------------------------------------------------------
  const form = document.getElementById("connection-form");
  if (form) {
    const result = document.getElementById("connection-result");
    const value = (name) => form.elements[name].value.trim();
    const checked = (name) => form.elements[name].checked;

    document.getElementById("test-button").addEventListener("click", async (event) => {
      const button = event.currentTarget;
      busy(button, true);
      show(result, "", "Проверяем подключение…");
      const body = {};
      if (value("domain")) body.domain = value("domain");
      if (value("api_key")) body.api_key = value("api_key");
      const r = await call("POST", `/config/${number}/test`, body);
      busy(button, false);
      if (!r.ok) return show(result, "error", "Проверка не выполнена: " + errorText(r));
      if (!r.data.ok) return show(result, "error", "Подключение не работает. " + describeRetailCrm(r.data.error));
      const items = [];
      if (r.data.scopes) items.push("Права ключа: " + (r.data.scopes.join(", ") || "нет"));
      if (r.data.sites_available) items.push("Магазины: " + (r.data.sites_available.join(", ") || "нет"));
      if (r.data.telephony_access !== undefined) items.push("Телефония: " + (r.data.telephony_access ? "разрешена" : "нет доступа"));
      if (r.data.integration_access !== undefined) items.push("Регистрация модуля: " + (r.data.integration_access ? "разрешена" : "нет доступа"));
      if (r.data.versions) items.push("Версии API: " + r.data.versions.join(", "));
      show(result, "ok", "Подключение работает.", items);
    });

    document.getElementById("save-button").addEventListener("click", async (event) => {
      const button = event.currentTarget;
      busy(button, true);
      show(result, "", "Сохраняем…");
      const current = await call("GET", `/config/${number}`);
      if (!current.ok) { busy(button, false); return show(result, "error", "Не удалось прочитать настройки: " + errorText(current)); }
      const c = current.data;
      const body = {
        domain: value("domain"),
        enabled: checked("enabled"),
        user_extensions: c.user_extensions || {},
        timezone: c.timezone,
        account_timezone: value("account_timezone") || null,
        internal_calls: !!c.internal_calls,
        external_phones: c.external_phones || [],
        smart_redirect: Object.assign({}, c.smart_redirect || {}, { enabled: checked("smart_redirect") }),
        events: {
          incoming_popups: checked("incoming_popups"),
          outgoing_popups: checked("outgoing_popups"),
          call_history: checked("call_history"),
        },
      };
      if (value("api_key")) body.api_key = value("api_key");
      const saved = await call("PUT", `/config/${number}`, body);
      if (!saved.ok) { busy(button, false); return show(result, "error", "Не сохранено: " + errorText(saved)); }
      form.elements.api_key.value = "";
      const reg = await call("POST", `/register/${number}`);
      busy(button, false);
      if (!reg.ok) {
        const err = reg.data && reg.data.error && reg.data.error.retailcrm;
        return show(result, "error", "Настройки сохранены, но модуль не зарегистрирован. " +
          (err ? describeRetailCrm(err) : errorText(reg)));
      }
      show(result, "ok", "Сохранено. Модуль телефонии зарегистрирован в RetailCRM.");
      const hint = document.getElementById("api_key_hint");
      if (saved.data.api_key && hint) hint.textContent = `Ключ сохранён (…${saved.data.api_key.slice(-4)}). Введите новый, чтобы заменить его.`;
    });

    const del = document.getElementById("delete-button");
    if (del) {
      del.addEventListener("click", async () => {
        const box = document.getElementById("delete-result");
        if (!window.confirm("Удалить интеграцию? Модуль в RetailCRM будет деактивирован, настройки удалены, ссылки входа отозваны.")) return;
        busy(del, true);
        const r = await call("DELETE", `/config/${number}`);
        busy(del, false);
        if (!r.ok) return show(box, "error", "Не удалено: " + errorText(r));
        window.location.assign("/retailcrm-admin/?deleted=1");
      });
    }
  }

  // -- «Менеджеры» -------------------------------------------------------------------------------
  const managers = document.getElementById("managers-form");
  if (managers) {
    const selects = Array.from(managers.querySelectorAll("select[data-user]"));
    const moves = document.getElementById("moves");
    const result = document.getElementById("managers-result");
    const initial = new Map(selects.map((s) => [s.dataset.user, s.value]));

    function noteMove(text) {
      const li = document.createElement("li");
      li.textContent = text;
      moves.appendChild(li);
    }

    selects.forEach((select) => {
      select.addEventListener("change", () => {
        if (!select.value) return;
        for (const other of selects) {
          if (other !== select && other.value === select.value) {
            other.value = "";
            noteMove(`Номер ${select.value} перейдёт от «${other.dataset.name}» к «${select.dataset.name}».`);
          }
        }
      });
    });

    function mapping() {
      const out = {};
      for (const s of selects) if (s.value) out[s.dataset.user] = s.value;
      return out;
    }

    async function save(button, extensions) {
      busy(button, true);
      show(result, "", "Сохраняем назначения…");
      const r = await call("PUT", `/managers/${number}`, { user_extensions: extensions });
      busy(button, false);
      if (!r.ok) return show(result, "error", "Не сохранено: " + errorText(r));
      moves.textContent = "";
      const count = Object.keys(r.data.user_extensions || {}).length;
      if (r.data.pushed === false) {
        return show(result, "error", `Назначения сохранены здесь (${count}), но RetailCRM их не принял. ` +
          describeRetailCrm(r.data.retailcrm_error) + ". В RetailCRM остались прежние номера.");
      }
      if (r.data.pushed === null) {
        return show(result, "ok", `Назначения сохранены (${count}). Модуль ещё не зарегистрирован: они уйдут в RetailCRM при регистрации.`);
      }
      show(result, "ok", `Назначения сохранены (${count}) и отправлены в RetailCRM.`);
      selects.forEach((s) => initial.set(s.dataset.user, s.value));
    }

    document.getElementById("save-managers").addEventListener("click", (e) => save(e.currentTarget, mapping()));
    const fix = document.getElementById("fix-button");
    if (fix) fix.addEventListener("click", (e) => save(e.currentTarget, mapping()));
    const importButton = document.getElementById("import-button");
    if (importButton) {
      importButton.addEventListener("click", () => {
        for (const s of selects) {
          if (s.dataset.remote && Array.from(s.options).some((o) => o.value === s.dataset.remote)) s.value = s.dataset.remote;
        }
        show(result, "", "Номера из RetailCRM подставлены. Проверьте и нажмите «Сохранить назначения».");
      });
    }
  }

  // -- «Журнал»: повторная отправка ------------------------------------------------------------
  async function replay(button, body) {
    const box = document.getElementById("replay-result");
    busy(button, true);
    const r = await call("POST", `/replay/${number}`, body);
    busy(button, false);
    if (!r.ok) return show(box, "error", "Не отправлено: " + errorText(r));
    show(box, "ok", `Поставлено в очередь повторно: ${r.data.replayed}.`);
  }
  const sinceForm = document.getElementById("replay-since-form");
  if (sinceForm) {
    sinceForm.addEventListener("submit", (event) => {
      event.preventDefault();
      const raw = sinceForm.elements.since.value;
      if (!raw) return show(document.getElementById("replay-result"), "error", "Укажите, с какого момента.");
      replay(sinceForm.querySelector("button"), { since: new Date(raw).toISOString() });
    });
  }
  document.querySelectorAll("[data-replay-call]").forEach((b) =>
    b.addEventListener("click", () => replay(b, { call_unique_id: b.dataset.replayCall })));
  document.querySelectorAll("[data-replay-event]").forEach((b) =>
    b.addEventListener("click", () => replay(b, { id: Number(b.dataset.replayEvent) })));

  // -- «Выйти»: end the session on the server, then go to the entry page -------------------------
  const logout = document.querySelector("form.account");
  if (logout) {
    logout.addEventListener("submit", async (event) => {
      event.preventDefault();
      try {
        await fetch("/retailcrm-admin/logout", { method: "POST", headers: { "X-CSRF-Token": csrf }, credentials: "same-origin" });
      } finally {
        window.location.assign("/retailcrm-admin/?logged_out=1");
      }
    });
  }
})();
