// Swagger UI over the bundled files (no CDN); an external script because the CSP forbids inline ones.
"use strict";
window.addEventListener("DOMContentLoaded", () => {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    // The validator badge would call validator.swagger.io: nothing leaves the origin.
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis],
  });
});
