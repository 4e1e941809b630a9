// @ts-check
import js from '@eslint/js';
import prettier from 'eslint-config-prettier';
import importX from 'eslint-plugin-import-x';
import tseslint from 'typescript-eslint';

/** Each folder is a role with one door (its index.ts); nothing reaches around it. */
const layerDoors = {
  patterns: [
    {
      group: ['**/criu/*', '!**/criu/index.js'],
      message: 'import src/criu through its index.js',
    },
    {
      group: ['**/wire/*', '!**/wire/index.js'],
      message: 'import src/wire through its index.js',
    },
    {
      group: ['**/tls/*', '!**/tls/index.js'],
      message: 'import src/tls through its index.js',
    },
    // The controller's folders, one role each; import-x/no-cycle keeps the arrows one way.
    {
      group: ['**/agents/*', '!**/agents/index.js'],
      message: 'import controller/agents through its index.js',
    },
    {
      group: ['**/cli/*', '!**/cli/index.js'],
      message: 'import controller/cli through its index.js',
    },
    {
      group: ['**/fleet/*', '!**/fleet/index.js'],
      message: 'import controller/fleet through its index.js',
    },
    {
      group: ['**/install/*', '!**/install/index.js'],
      message: 'import controller/install through its index.js',
    },
    {
      group: ['**/lab/*', '!**/lab/index.js'],
      message: 'import controller/lab through its index.js',
    },
    {
      group: ['**/migration/*', '!**/migration/index.js'],
      message: 'import src/migration and controller/migration through their index.js',
    },
    { group: ['**/test/**', '**/scripts/**'], message: 'nothing imports from test/ or scripts/' },
  ],
};

export default tseslint.config(
  { ignores: ['dist/', 'build/', 'node_modules/', 'src/generated/', '.criu/'] },
  js.configs.recommended,
  ...tseslint.configs.recommendedTypeChecked,
  {
    languageOptions: {
      parserOptions: { projectService: true, tsconfigRootDir: import.meta.dirname },
    },
    plugins: { 'import-x': importX },
    rules: {
      '@typescript-eslint/no-floating-promises': 'error',
      '@typescript-eslint/consistent-type-imports': ['error', { fixStyle: 'inline-type-imports' }],
      '@typescript-eslint/no-import-type-side-effects': 'error',
      '@typescript-eslint/no-unused-vars': ['error', { argsIgnorePattern: '^_' }],
      'import-x/no-cycle': 'error',
      'import-x/no-self-import': 'error',
      'import-x/no-duplicates': 'error',
    },
  },
  {
    files: ['agent/**/*.ts', 'controller/**/*.ts', 'src/**/*.ts'],
    ignores: ['src/criu/**', 'src/wire/**', 'src/tls/**'],
    rules: { 'no-restricted-imports': ['error', layerDoors] },
  },
  {
    files: ['**/*.js', '**/*.mjs'],
    ...tseslint.configs.disableTypeChecked,
  },
  prettier,
);
