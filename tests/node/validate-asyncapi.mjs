// Validates an AsyncAPI document (JSON, path as the argument) against the
// official AsyncAPI 3.0.0 JSON schema from @asyncapi/specs. Exit 0 when
// valid; otherwise prints every error and exits 1.
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import Ajv from "ajv";
import addFormats from "ajv-formats";

const require = createRequire(import.meta.url);
const schema = require("@asyncapi/specs/schemas/3.0.0-without-$id.json");
const document = JSON.parse(readFileSync(process.argv[2], "utf8"));

const ajv = new Ajv({ allErrors: true, strict: false });
addFormats(ajv);
const validate = ajv.compile(schema);
if (validate(document)) {
  console.log("valid AsyncAPI 3.0.0");
} else {
  console.error(JSON.stringify(validate.errors, null, 2));
  process.exit(1);
}
